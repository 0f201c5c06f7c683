"""The Serve application on the embedded model with the TEST FIXTURE SAE (tests/sae_fixture.py) and a VectorSet
derived from 4 GlobalOpinionQA samples per perspective: one app for the whole module (both backends)."""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from pipelines.tasks import BUNDLED
from pipelines.vectors import VectorConfig, config_pairs, derive_fine, vector_sets
from sae.decoding import Decoding, plural_generate, plural_next_token
from sae.lm import model_name
from sae.vectorset import VectorSet

KEY = "test-key-7f3a"
NAME = "gqa-test"


@dataclass
class App:
    url: str
    perspectives: list[str]
    vectors: VectorSet
    client: Any  # RegistryClient

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEY}"}

    def post(self, path: str, body: dict[str, Any], **kw: Any) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.headers, timeout=180, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _derive(model, tok, fixture) -> VectorSet:
    cfg = VectorConfig(sae=fixture.path, task="globalopinionqa", samples=4, max_perspectives=3, granularity="fine",
                       publish=False, track=False)  # fmt: skip
    pairs = config_pairs(cfg, tok)
    readouts = derive_fine(cfg, model, tok, fixture.sae, fixture.layer, pairs)
    return vector_sets(cfg, readouts, model=model_name(model), layer=fixture.layer, sae=fixture.sae, extra={})["fine"]


@pytest.fixture(scope="module")
def app(embedded, embedded_sae, tmp_path_factory):
    import ray
    from ray import serve

    from common.registry import RegistryClient
    from serve.app import build
    from serve.config import ServeConfig

    patch = pytest.MonkeyPatch()
    patch.setenv("PLURISTEER_API_KEYS", f"another-key, {KEY}")  # before ray.init: the replicas inherit it
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="pluristeer-serve-tests")
    try:
        t1 = time.perf_counter()
        vs = _derive(*embedded, embedded_sae)
        t2 = time.perf_counter()
        registry = tmp_path_factory.mktemp("registry")
        client = RegistryClient(registry)
        client.publish(vs, NAME)
        port = _free_port()
        cfg = ServeConfig.from_dict(
            {
                "vectors": NAME, "registry_dir": str(registry), "backend": "both", "port": port,
                "replica_cpus": 0.25, "aggregator_cpus": 0.25, "max_tokens_limit": 12, "default_max_tokens": 6,
                "max_perspectives": 3, "max_prompt_tokens": 512, "vector_poll_s": 0.5,
                "deployments": {"PluralAggregator": {"num_replicas": 1}},  # one replica: one set of counters
            }
        )  # fmt: skip
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(cfg), name=cfg.app_name, route_prefix="/")
        print(f"ray {t1 - t0:.1f} s, vectors {t2 - t1:.1f} s, serve app {time.perf_counter() - t2:.1f} s")
        yield App(f"http://127.0.0.1:{port}", vs.perspectives, vs, client)
    finally:
        serve.shutdown()
        ray.shutdown()
        patch.undo()


def _chat(tok, text: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


QUESTION = "Is it more important to protect the environment or to grow the economy? Answer in one sentence."


def test_plural_decoding_over_three_perspectives_equals_offline_plural_generate(app, embedded, embedded_sae) -> None:
    model, tok = embedded
    prompt = _chat(tok, QUESTION)
    offline = plural_generate(
        model, tok, [prompt], app.vectors, app.perspectives, Decoding("dvd"), embedded_sae.sae,
        max_new_tokens=10, return_scores=True,
    )  # fmt: skip
    assert offline.scores is not None
    for backend in ("replicas", "fused"):
        r = app.post("/v1/completions", {"prompt": prompt, "max_tokens": 10, "temperature": 0, "logprobs": 3,
                                         "backend": backend})  # fmt: skip
        assert r.status_code == 200, r.text
        body = r.json()
        (choice,) = body["choices"]
        steps = choice["distributions"]
        assert [s["id"] for s in steps] == offline.tokens[0], backend
        assert choice["text"] == offline.texts[0] and choice["text"].strip()
        assert body["pluristeer"]["perspectives"] == app.perspectives and body["pluristeer"]["backend"] == backend
        assert body["usage"]["completion_tokens"] == len(steps)
        for i, s in enumerate(steps):  # the combined log-probability of each chosen token, as offline
            assert abs(s["logprob"] - offline.scores[0, i, s["id"]].item()) < 2e-3
            assert set(s["perspectives"]) == set(app.perspectives) and all(
                len(v) == 3 for v in s["perspectives"].values()
            )
            assert abs(sum(s["weights"].values()) - 1) < 1e-4
        first = {p: v[0]["logprob"] for p, v in steps[0]["perspectives"].items()}
        assert max(first.values()) - min(first.values()) > 1e-3, "the perspectives' distributions should differ"
    # sampling with a seed: the same generator and (up to float error) the same scores, so the same tokens
    sampled = plural_generate(model, tok, [prompt], app.vectors, app.perspectives, Decoding("mean", top_k=20),
                              embedded_sae.sae, max_new_tokens=8, do_sample=True, temperature=0.9, seed=11)  # fmt: skip
    r = app.post("/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0.9, "seed": 11, "logprobs": 0,
                                     "backend": "fused", "decoding": {"mode": "mean", "top_k": 20}})  # fmt: skip
    assert [s["id"] for s in r.json()["choices"][0]["distributions"]] == sampled.tokens[0]


def test_the_fanout_client_over_serve_handles_answers_as_the_http_api(app, embedded) -> None:
    """serve/fanout.py driven from here over the app's deployment handles (no HTTP): the same tokens as
    /v1/completions for the same request, on both backends, and the sessions released afterwards."""
    import asyncio

    from ray import serve

    from serve.config import BASE, FUSED, perspective_deployment
    from serve.fanout import Fanout
    from serve.generation import GenParams

    tok = embedded[1]
    prompt = _chat(tok, QUESTION)
    handles = {p: serve.get_deployment_handle(perspective_deployment(p), app_name="pluristeer")
               for p in app.perspectives}  # fmt: skip
    base, fused = (serve.get_deployment_handle(n, app_name="pluristeer") for n in (BASE, FUSED))
    before = {n: _stats(n)["sessions"] for n in (BASE, FUSED)}
    for backend in ("replicas", "fused"):
        r = app.post("/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 0,
                                         "backend": backend})  # fmt: skip
        expected = [s["id"] for s in r.json()["choices"][0]["distributions"]]
        params = GenParams(ids=tok(prompt, add_special_tokens=False)["input_ids"], perspectives=app.perspectives,
                           decoding=Decoding("dvd", alpha=0.2, tau=0.4, top_k=20), max_tokens=6, temperature=0.0,
                           eos=tok.eos_token_id)  # fmt: skip

        async def run(backend: str = backend, params: GenParams = params) -> Any:
            client = Fanout(handles, base, fused, step_timeout_s=60, request_timeout_s=120)
            out = await client.generate(params, backend, tok, stops=[])
            await client.drain()
            return out

        out = asyncio.run(run())
        assert [e.token for e in out.events] == expected, backend
        assert set(out.info["vector_versions"]) == set(app.perspectives)
    after = {n: _stats(n)["sessions"] for n in (BASE, FUSED)}
    assert after[BASE] <= before[BASE] and after[FUSED] <= before[FUSED]


def test_distribution_per_perspective_and_combined(app, embedded, embedded_sae) -> None:
    model, tok = embedded
    record = next(r for r in BUNDLED["globalopinionqa"].records("test") if len(r.options) >= 3)
    letters = [chr(65 + i) for i in range(len(record.options))]
    prompt = _chat(tok, record.text)
    r = app.post("/v1/distribution", {"prompt": prompt, "options": letters, "decoding": {"mode": "cad", "alpha": 0.5}})
    assert r.status_code == 200, r.text
    body = r.json()
    batch = tok([prompt], return_tensors="pt", add_special_tokens=False)
    from sae.readout import label_token_ids, option_probs

    ids = label_token_ids(tok, letters)
    combined = plural_next_token(model, batch["input_ids"], batch["attention_mask"], app.vectors, app.perspectives,
                                 Decoding("cad", alpha=0.5), embedded_sae.sae)  # fmt: skip
    want, _ = option_probs(combined, ids)
    assert torch.allclose(torch.tensor(body["combined"]["probs"]), want[0], atol=1e-4)
    for p in app.perspectives:
        single = plural_next_token(model, batch["input_ids"], batch["attention_mask"], app.vectors, [p],
                                   Decoding("mean"), embedded_sae.sae)  # fmt: skip
        got = body["perspectives"][p]
        assert torch.allclose(torch.tensor(got["probs"]), option_probs(single, ids)[0][0], atol=1e-4)
        assert abs(sum(got["probs"]) - 1) < 1e-5 and 0 < got["coverage"] <= 1
    assert set(body["unsteered"]) == {"probs", "coverage"} and body["vector_versions"] == dict.fromkeys(
        app.perspectives, 1
    )
    fused = app.post("/v1/distribution", {"prompt": prompt, "options": letters, "backend": "fused",
                                          "decoding": {"mode": "cad", "alpha": 0.5}}).json()  # fmt: skip
    assert torch.allclose(torch.tensor(fused["combined"]["probs"]), want[0], atol=1e-4)


def test_the_official_openai_client_works(app) -> None:
    import openai

    client = openai.OpenAI(base_url=app.url + "/v1", api_key=KEY, max_retries=0, timeout=180)
    two = app.perspectives[:2]
    done = client.completions.create(
        model="pluristeer", prompt="The best food in the world is", max_tokens=5, temperature=0,
        extra_body={"perspectives": two, "decoding": {"mode": "cad", "alpha": 0.3}},
    )  # fmt: skip
    assert done.object == "text_completion" and done.choices[0].text and done.usage.completion_tokens <= 5
    assert done.model_extra["pluristeer"]["perspectives"] == two
    messages = [{"role": "user", "content": "Name one city."}]
    chat = client.chat.completions.create(model="pluristeer", messages=messages, max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    stream = client.chat.completions.create(
        model="pluristeer", messages=messages, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason
    unsteered = client.completions.create(model="x", prompt="Hello", max_tokens=3, temperature=0,
                                          extra_body={"perspectives": []})  # fmt: skip
    assert unsteered.model_extra["pluristeer"]["perspectives"] == []
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=app.url + "/v1", api_key="wrong", max_retries=0).models.list()


ENDPOINTS = [
    ("GET", "/v1/perspectives", None), ("GET", "/v1/models", None), ("GET", "/metrics", None),
    ("GET", "/openapi.json", None), ("POST", "/v1/completions", {"prompt": "x"}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ("POST", "/v1/distribution", {"prompt": "x", "options": ["A", "B"]}),
]  # fmt: skip


@pytest.mark.security
def test_keys_are_required_everywhere_but_healthz(app) -> None:
    for method, path, body in ENDPOINTS:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
            r = httpx.request(method, app.url + path, json=body, headers=headers, timeout=30)
            assert r.status_code == 401, (path, headers, r.text)
            assert "API key" in r.json()["error"]["message"] and KEY not in r.text
        if body is not None:  # the key is checked before the body
            assert httpx.post(app.url + path, json={"junk": 1}, timeout=30).status_code == 401
    r = httpx.get(app.url + "/healthz", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    perspectives = httpx.get(app.url + "/v1/perspectives", headers=app.headers, timeout=30).json()
    assert [p["id"] for p in perspectives["data"]] == app.perspectives
    assert perspectives["vectors"]["layer"] == 15 and perspectives["backends"] == ["replicas", "fused"]


BAD = [
    ("/v1/completions", {"prompt": "x", "max_tokens": 999}, "max_tokens: 999 is above the limit 12"),
    ("/v1/completions", {"prompt": "x", "perspectives": ["Atlantis"]}, "unknown ['Atlantis']"),
    ("/v1/completions", {"prompt": "x", "perspectives": ["a", "b", "c", "d"]}, "at most 3"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "x", "bogus": 1}, "bogus: Extra inputs are not permitted"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {}, "prompt: Field required"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n:"),
    ("/v1/completions", {"prompt": "x", "decoding": {"mode": "vote"}}, "decoding.mode"),
    ("/v1/completions", {"prompt": "x", "decoding": {"tau": 0}}, "decoding.tau"),
    ("/v1/completions", {"prompt": "word " * 600}, "the limit is 512"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ("/v1/distribution", {"prompt": "x", "options": []}, "options"),
    ("/v1/distribution", {"options": ["A"]}, "exactly one of prompt and messages"),
    ("/v1/distribution", {"prompt": "x", "options": ["Yes", "yes"]}, "start with the same token"),
]


@pytest.mark.hostile
@pytest.mark.parametrize(("path", "body", "message"), BAD, ids=[f"{p}-{m[:20]}" for p, _, m in BAD])
def test_bad_bodies_are_422_with_a_message(app, path: str, body: dict[str, Any], message: str) -> None:
    r = app.post(path, body)
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]["message"]


@pytest.mark.hostile
def test_not_json_is_422(app) -> None:
    r = httpx.post(
        app.url + "/v1/completions", content=b"{", headers={**app.headers, "content-type": "application/json"}
    )
    assert r.status_code == 422 and r.json()["error"]["message"]


RAW = [  # (id, raw body, status, message part): what JSON parsers and schemas are often lenient about
    ("nan-literal", b'{"prompt": "x", "temperature": NaN}', 422, "temperature"),
    ("infinity-literal", b'{"prompt": "x", "decoding": {"alpha": Infinity}}', 422, "decoding.alpha"),
    ("huge-number", b'{"prompt": "x", "max_tokens": 1e400}', 422, "max_tokens"),
    ("negative", b'{"prompt": "x", "max_tokens": -5}', 422, "max_tokens"),
    ("deep-nesting", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "error parsing the body"),
    ("lone-surrogate", b'{"prompt": "\\ud800 hi", "max_tokens": 1}', 422, "unable to parse raw data as a unicode"),
    ("null-bytes", b'{"prompt": "a\\u0000b", "max_tokens": 1}', 200, ""),
    ("many-prompts", json.dumps({"prompt": ["x"] * 1000, "max_tokens": 1}).encode(), 422, "at most 8"),
    ("over-the-body-limit", b'{"prompt": "' + b"x" * 1_100_000 + b'"}', 413, "larger than"),
    ("not-an-object", b"[1, 2, 3]", 422, ""),
    ("wrong-type-perspectives", b'{"prompt": "x", "perspectives": "France"}', 422, "perspectives"),
]


@pytest.mark.hostile
@pytest.mark.parametrize(("body", "status", "message"), [r[1:] for r in RAW], ids=[r[0] for r in RAW])
def test_hostile_raw_bodies_get_a_clear_4xx(app, body: bytes, status: int, message: str) -> None:
    headers = {**app.headers, "content-type": "application/json"}
    r = httpx.post(app.url + "/v1/completions", content=body, headers=headers, timeout=120)
    assert r.status_code == status, r.text[:500]
    if status != 200:
        assert message in r.json()["error"]["message"], r.text[:500]


@pytest.mark.hostile
def test_fuzzed_requests_never_get_a_server_error(app) -> None:
    """Schemathesis cases from the API's own OpenAPI schema (valid and invalid), a bounded number."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.generation.modes import GenerationMode

    spec = httpx.get(app.url + "/openapi.json", headers=app.headers, timeout=30).json()
    schema = schemathesis.openapi.from_dict(spec)
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
    seen: list[int] = []

    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=cases)
    def check(case) -> None:
        response = case.call(base_url=app.url, headers=app.headers, timeout=120)
        seen.append(response.status_code)
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])

    check()
    assert len(seen) >= 20 and 422 in seen and 200 in seen


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples
    }


def test_metrics_per_deployment(app) -> None:
    r = httpx.get(app.url + "/metrics", headers=app.headers, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = _samples(r.text)

    def value(name: str, **labels: str) -> float:
        return m.get((name, frozenset(labels.items())), 0.0)

    for p in app.perspectives:
        name = f"PerspectiveModel-{p.lower()}"
        assert value("pluristeer_deployment_calls_total", deployment=name, outcome="ok") > 10
        assert value("pluristeer_deployment_call_seconds_count", deployment=name) > 10
        assert value("pluristeer_deployment_tokens_total", deployment=name) > 10
        assert any(
            k[0] == "pluristeer_replica_rss_bytes" and ("deployment", name) in k[1] and v > 1e8 for k, v in m.items()
        )
    assert value("pluristeer_requests_total", endpoint="/v1/completions", code="200") >= 3
    assert value("pluristeer_requests_total", endpoint="/v1/completions", code="422") >= 5
    assert value("pluristeer_tokens_total", kind="completion", backend="fused") > 0
    assert value("pluristeer_deployment_tokens_total", deployment="FusedPlural") > 0
    assert value("pluristeer_request_seconds_count", endpoint="/v1/distribution") >= 2


def _stats(name: str) -> dict[str, Any]:
    from ray import serve

    return serve.get_deployment_handle(name, app_name="pluristeer").stats.remote().result(timeout_s=60)


def test_a_new_vector_version_is_picked_up_without_a_restart(app, embedded, embedded_sae) -> None:
    target = app.perspectives[0]
    pid = _stats(f"PerspectiveModel-{target.lower()}")["pid"]
    body = {"prompt": _chat(embedded[1], QUESTION), "options": ["A", "B", "C"], "perspectives": [target]}
    before = app.post("/v1/distribution", body).json()
    changed = VectorSet(
        {p: v * (4.0 if p == target else 1.0) for p, v in app.vectors.vectors.items()}, app.vectors.meta
    )
    assert app.client.publish(changed, NAME) == f"{NAME}@2"
    deadline, after = time.monotonic() + 60, before
    while after["vector_versions"][target] != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
        after = app.post("/v1/distribution", body).json()
    assert after["vector_versions"] == {target: 2}
    assert max(abs(a - b) for a, b in zip(after["perspectives"][target]["probs"],
                                          before["perspectives"][target]["probs"], strict=True)) > 1e-4  # fmt: skip
    assert _stats(f"PerspectiveModel-{target.lower()}")["pid"] == pid  # the same replica process
    fused = app.post("/v1/distribution", {**body, "backend": "fused"}).json()
    deadline = time.monotonic() + 60
    while fused["vector_versions"][target] != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
        fused = app.post("/v1/distribution", {**body, "backend": "fused"}).json()
    assert abs(fused["perspectives"][target]["probs"][0] - after["perspectives"][target]["probs"][0]) < 1e-4


def test_bounded_load_has_no_errors_and_leaks_no_sessions(app) -> None:
    """benchmarks/load.py, short: 30 requests of every kind, 6 in flight; every one answered as expected
    (3 refused with 422 on purpose), and the replicas hold no more KV-cached sessions afterwards than before."""
    import asyncio

    from benchmarks.load import render, run_load

    report = asyncio.run(run_load(app.url, KEY, requests=30, concurrency=6, time_cap_s=240, max_tokens=3, warmup=0))
    print(render(report))
    assert report.errors == 0, report.error_samples
    assert report.started == report.ok == 30 and report.rejected_as_expected == 3
    assert report.peak_concurrency == 6 and report.completion_tokens >= 3 * 20
    assert len(report.memory_after) == len(app.perspectives) + 2  # every model deployment was scraped
    assert report.sessions_after() <= sum(m["sessions"] for m in report.memory_before.values())


@pytest.mark.fault
def test_killing_a_perspective_replica_loses_no_request(app) -> None:
    """8 streamed generations run; one perspective's replica is killed after each has its first tokens; all 8
    finish with every token (the aggregator retries, the restarted replica replays the prefixes)."""
    import ray

    victim = f"PerspectiveModel-{app.perspectives[1].lower()}"
    old_pid = _stats(victim)["pid"]
    started = threading.Barrier(9)
    results: list[dict[str, Any]] = []

    def run(i: int) -> None:
        body = {"prompt": f"Story {i}: once upon a time", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}, "backend": "replicas"}  # fmt: skip
        chunks, errors, signalled = [], [], False
        with httpx.stream("POST", app.url + "/v1/completions", json=body, headers=app.headers, timeout=300) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    errors.append(event["error"])
                    continue
                chunks.append(event)
                if len(chunks) == 2 and not signalled:
                    signalled = True
                    started.wait(timeout=300)
            results.append({"status": r.status_code, "chunks": chunks, "errors": errors, "done": time.monotonic()})
        if not signalled:
            started.wait(timeout=300)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    started.wait(timeout=300)
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if victim in a["name"]]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    killed = time.monotonic()
    for t in threads:
        t.join(timeout=300)
    assert len(results) == 8
    for res in results:
        assert res["status"] == 200 and not res["errors"], res["errors"]
        assert res["chunks"][-2]["choices"][0]["finish_reason"] == "length"
        assert res["chunks"][-1]["usage"]["completion_tokens"] == 12
        assert res["done"] > killed
    tokens = httpx.get(app.url + "/metrics", headers=app.headers, timeout=60).text
    replays = [
        line for line in tokens.splitlines() if line.startswith(f'pluristeer_replays_total{{deployment="{victim}"')
    ]
    assert replays and float(replays[0].split()[-1]) >= 1, "the restarted replica replayed the sessions' prefixes"
    assert _stats(victim)["pid"] != old_pid


@pytest.mark.security
def test_api_keys_never_reach_logs_or_responses(app) -> None:
    """After every request of this module (good, wrong and missing keys, errors, a replica killed): no log file
    of the Ray session and no response carries a key, and an unknown key sent in every place is not echoed."""
    import ray

    probe = "probe-key-9c41e2"
    for headers in ({"Authorization": f"Bearer {probe}"}, {"Authorization": probe}, {"X-Api-Key": probe}):
        r = httpx.post(app.url + "/v1/completions?api_key=" + probe, json={"prompt": probe, "max_tokens": 999},
                       headers=headers, timeout=30)  # fmt: skip
        assert r.status_code == 401 and probe not in r.text
    bad = app.post("/v1/completions", {"prompt": "x", "max_tokens": 999, "user": probe})
    assert bad.status_code == 422 and KEY not in bad.text
    metrics = httpx.get(app.url + "/metrics", headers=app.headers, timeout=30).text
    assert KEY not in metrics and "another-key" not in metrics
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert len(files) > 10 and any("serve" in str(p) for p in files), files[:20]
    for path in files:
        data = path.read_bytes()
        for secret in (KEY, "another-key", probe):
            assert secret.encode() not in data, f"{secret} found in {path}"
