"""``pluristeer recommend``: the decision rule on outputs made in the test (no model), and a perspective JSONL
made in the test going through vectors -> evaluate -> recommend -> serve on the embedded model with the TEST
FIXTURE SAE (tests/sae_fixture.py). The sweep (``evaluate --sweep``, the same engine on the same held-out
records) runs on the same Ray instance here, to pay for one start-up."""

from __future__ import annotations

import dataclasses
import json
import random
import socket
import uuid
from pathlib import Path

import httpx
import pytest

from pipelines.eval_config import EvalConfig
from pipelines.eval_plan import BASELINE, Condition, SteerSpec, TaskData, output_id
from pipelines.prompts import generic_spec
from pipelines.recommend import Candidate, rank, serve_settings, winner_of
from pipelines.records import PerspectiveRecord
from pipelines.sweep import gain
from sae import storage
from serve.config import ServeConfig
from tests.sae_fixture import fixture_sae

PERSPECTIVES = ("bus riders", "cyclists", "drivers")


def _task(n: int = 30, kind: str = "classify") -> TaskData:
    records = []
    for p in PERSPECTIVES:
        for i in range(n):
            if kind == "classify":
                extra = {"label": i % 2}
            else:
                extra = {"distribution": (0.7, 0.2, 0.1) if i % 2 else (0.1, 0.2, 0.7)}
            options = ("yes", "no") if kind == "classify" else ("a", "b", "c")
            records.append(PerspectiveRecord(id=f"{p}-{i}", kind=kind, text=f"item {i}", options=options,
                                             perspective=p, **extra))  # fmt: skip
    spec = generic_spec("t", kind)
    return TaskData("t", kind, spec, records, {}, [], list(PERSPECTIVES), list(PERSPECTIVES),
                    dict.fromkeys(PERSPECTIVES, n))  # fmt: skip


def _steer(name: str, c: float = 1.0) -> Candidate:
    return Candidate(Condition(name, steer=SteerSpec("8x-fine", "sae", c)), "sae", 15, "8x", "fine")


def _outputs(task: TaskData, cand: Candidate, right: float, coverage: float, seed: int) -> dict:
    """Answers of ``cand``: the gold option with probability mass 0.9 on a share ``right`` of the records."""
    rng = random.Random(seed)
    out = {}
    for r in task.records:
        n = len(r.options)
        gold = r.label if r.label is not None else max(range(n), key=r.distribution.__getitem__)
        hit = rng.random() < right
        probs = [0.1 / (n - 1)] * n
        probs[gold if hit else (gold + 1) % n] = 0.9
        out[output_id(task.name, cand.condition, r)] = {"probs": probs, "coverage": coverage}
    return out


def _found(task: TaskData, specs: list[tuple[Candidate, float, float]]) -> list[tuple[Candidate, dict]]:
    return [(c, _outputs(task, c, right, cov, seed=i)) for i, (c, right, cov) in enumerate(specs)]


def test_a_clear_gain_is_recommended_noise_and_collapsed_coverage_are_not() -> None:
    cfg, task = EvalConfig(bootstrap=500), _task()
    base = Candidate(Condition(BASELINE), "zero-shot")
    good, noisy, collapsed = _steer("good"), _steer("noisy", 2.0), _steer("collapsed", 8.0)
    rows = rank(cfg, task, _found(task, [(base, 0.5, 0.8), (good, 0.9, 0.7), (noisy, 0.55, 0.8),
                                         (collapsed, 1.0, 0.05)]))  # fmt: skip
    by = {r["candidate"]: r for r in rows}
    assert by["good"]["recommended"] and by["good"]["gain_family_lo"] > 0
    assert not by["noisy"]["recommended"] and by["noisy"]["gain_family_lo"] <= 0
    assert not by["collapsed"]["recommended"] and not by["collapsed"]["covered"] and by["collapsed"]["gain"] > 0
    assert [r["rank"] for r in rows] == [1, 2, 3, 4] and rows[0]["candidate"] == "collapsed"  # ranked by Δ alone
    assert winner_of(rows)["candidate"] == "good"
    for r in rows:  # the family-wise bound is never above the 95% one
        assert r["gain_family_lo"] <= r["gain_lo"] + 1e-12


def test_more_candidates_widen_the_family_wise_interval() -> None:
    cfg, task = EvalConfig(bootstrap=500), _task()
    base = Candidate(Condition(BASELINE), "zero-shot")
    alone = rank(cfg, task, _found(task, [(base, 0.5, 0.8), (_steer("x"), 0.7, 0.8)]))
    crowd = rank(cfg, task, _found(task, [(base, 0.5, 0.8), (_steer("x"), 0.7, 0.8)]
                                   + [(_steer(f"other{i}"), 0.5, 0.8) for i in range(19)]))  # fmt: skip
    one = next(r for r in alone if r["candidate"] == "x")
    many = next(r for r in crowd if r["candidate"] == "x")
    assert one["gain"] == many["gain"] and one["gain_lo"] == many["gain_lo"]
    assert many["gain_family_lo"] < one["gain_family_lo"]


def test_distribution_gain_is_lower_jsd() -> None:
    cfg, task = EvalConfig(bootstrap=500), _task(kind="distribution")
    base = Candidate(Condition(BASELINE), "zero-shot")
    rows = rank(cfg, task, _found(task, [(base, 0.3, 0.8), (_steer("better"), 0.95, 0.8)]))
    better = next(r for r in rows if r["candidate"] == "better")
    zero = next(r for r in rows if r["candidate"] == BASELINE)
    assert better["metric"] == "jsd" and better["value"] < zero["value"] and better["gain"] > 0
    assert better["gain"] == pytest.approx(zero["value"] - better["value"])


def test_with_no_winner_the_serve_config_is_the_unsteered_model(tmp_path: Path) -> None:
    cfg, task = EvalConfig(bootstrap=500), _task(n=6)
    base = Candidate(Condition(BASELINE), "zero-shot")
    caa = Candidate(Condition("caa-fine c=2 @L9", steer=SteerSpec("caa-fine", "caa", 2.0)), "caa", 9, None, "fine")
    rows = rank(cfg, task, _found(task, [(base, 0.5, 0.8), (caa, 0.55, 0.8)]))
    assert winner_of(rows) is None
    best = next(r for r in rows if r["coeff"] is not None)
    fields, notes = serve_settings(cfg, task, None, best, tmp_path / "v.safetensors")
    assert fields["coeff"] == 0.0 and fields["steer_mode"] == "caa" and "Nothing beat zero-shot" in " ".join(notes)
    assert any("coeff to 2" in n for n in notes)
    served = ServeConfig.from_dict(fields)  # the fields are a valid serve config
    assert served.vectors == "t-caa-fine" and served.perspectives == list(PERSPECTIVES)


# -- end to end on the embedded model -------------------------------------------------------------------
VIEWS = {  # perspective -> (the label it gives when the item is about cars, otherwise), its reason
    "bus riders": ((1, 0), "buses need lanes more than cars need space"),
    "cyclists": ((1, 1), "every change should make streets safer for bikes"),
    "drivers": ((0, 1), "roads exist to move traffic quickly"),
}
TOPICS = ["a new bus lane on the high street", "closing a road to cars on Sundays", "a congestion charge",
          "wider pavements", "more parking in the centre", "a protected bike lane", "cheaper bus fares",
          "a lower speed limit", "a new ring road", "removing a roundabout", "park-and-ride sites"]  # fmt: skip


def _write_jsonl(path: Path, kind: str) -> dict[str, set[str]]:
    """Records with ``meta.split`` on each: 8 train and 3 test per perspective; returns the ids by split."""
    ids: dict[str, set[str]] = {"train": set(), "test": set()}
    lines = []
    for i, topic in enumerate(TOPICS):
        for p, ((if_cars, other), why) in VIEWS.items():
            split = "test" if i >= 8 else "train"
            rid = f"{kind}-{i}-{p.split()[0]}"
            ids[split].add(rid)
            row = {"id": rid, "kind": kind, "text": f"Should the city build {topic}?", "perspective": p,
                   "feedback": why, "meta": {"split": split}}  # fmt: skip
            cars = "car" in topic or "road" in topic or "parking" in topic
            if kind == "classify":
                row |= {"options": ["support", "oppose"], "label": if_cars if cars else other}
            else:
                lean = [0.7, 0.2, 0.1] if (if_cars if cars else other) == 0 else [0.1, 0.3, 0.6]
                row |= {"options": ["support", "unsure", "oppose"], "distribution": lean}
            lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return ids


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, embedded, embedded_sae, data_root, s3_server):
    """One Ray instance: ``pluristeer demo --data``'s stages after training (vectors -> recommend -> evaluate on
    the test split) on a classify JSONL, recommend alone on a distribution JSONL, and the sweep over the SAE at
    layer 15, a second fixture SAE at layer 9 (``sweep_saes``) and CAA at layer 9, writing to the S3 server."""
    import ray

    from pipelines.demo import DemoSettings, user_pipeline
    from pipelines.recommend import run_recommend
    from pipelines.sweep import run_sweep
    from pipelines.tasks import get_task

    root = tmp_path_factory.mktemp("recommend")
    ids = _write_jsonl(root / "commute.jsonl", "classify")
    _write_jsonl(root / "commute-dist.jsonl", "distribution")
    settings = DemoSettings(samples=8, recommend_coeffs=(4.0,))
    patch = pytest.MonkeyPatch()
    patch.setenv("PLURISTEER_API_KEYS", "k")  # before ray.init: the serve replicas inherit it
    for key, value in s3_server.env.items():
        patch.setenv(key, value)
    sweep_out = s3_server.create_bucket(f"recommend-sweep-{uuid.uuid4().hex[:8]}") + "/sweep"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        data = str(root / "commute.jsonl")
        paths = user_pipeline(settings, "embedded", root / "demo", embedded_sae.path, get_task(data), data)
        lines: list[str] = []
        cfg = EvalConfig.load(None, [f"sae_8x={embedded_sae.path}", f"tasks=[{root / 'commute-dist.jsonl'}]",
                                     "bootstrap=200", "samples=8", "sweep_coeffs=[4]", "sweep_limit=0", "track=false",
                                     f"out={root / 'rec'}", f"work_dir={root / 'work'}"])  # fmt: skip
        report = run_recommend(cfg, echo=lines.append)
        early = fixture_sae(*embedded, data_root / "corpus", layer=9, n_tokens=4096, steps=150)
        sweep_cfg = dataclasses.replace(cfg, sweep_saes=[early.path], sweep_layers=[9], out=sweep_out)
        sweep = run_sweep(sweep_cfg, echo=lines.append)
        demo = json.loads((root / "demo" / "recommend" / "recommend.json").read_text())
        yield root, ids, paths, {"commute": demo["tasks"]["commute"], **report["tasks"]}, lines, (sweep_out, sweep)
    finally:
        ray.shutdown()
        patch.undo()


def test_meta_split_is_honoured_by_vectors_recommend_and_evaluate(pipeline) -> None:
    root, ids, paths, _, _, _ = pipeline
    vectors = next((root / "demo" / "vectors").glob("*fine*.safetensors"))
    from sae.vectorset import VectorSet

    assert set(VectorSet.load(vectors).perspectives) == set(VIEWS)
    predicted = {json.loads(line)["id"] for line in (paths["results"] / "predictions.jsonl").read_text().splitlines()}
    assert predicted == ids["test"]
    run = json.loads((paths["results"] / "run.json").read_text())
    assert run["splits"]["commute"]["rule"] == "meta.split"
    scored = set()  # every record id recommend answered: training records only
    for unit in (root / "demo" / "eval-work" / "recommend" / "units").rglob("*.json"):
        scored |= {oid.rsplit("|", 1)[1] for oid in json.loads(unit.read_text())["outputs"]}
    assert scored & ids["train"] and not scored & ids["test"]


def test_recommend_ranks_every_candidate_and_writes_its_files(pipeline) -> None:
    root, _, paths, entries, lines, _ = pipeline
    for entry in entries.values():
        names = {r["candidate"] for r in entry["ranking"]}
        assert {"zero-shot", "few-shot", "pd-dvd", "caa-fine c=4 @L15", "steer-8x-fine c=4 @L15",
                "steer-8x-coarse c=4 @L15", "pd-dvd+steer-8x c=4 @L15"} <= names  # fmt: skip
        assert entry["candidates"] == len(names) - 1 == 10
        assert [r["rank"] for r in entry["ranking"]] == list(range(1, len(names) + 1))
        gains = [r["gain"] for r in entry["ranking"]]
        assert gains == sorted(gains, reverse=True)
        assert entry["few_records"]  # 8 train records per perspective: 4 held out
    said = next(x for x in lines if x.startswith("recommend: commute-dist: ") and "Δ" in x)
    if entries["commute-dist"]["winner"] is None:
        assert "nothing beats zero-shot significantly" in said
    else:
        assert entries["commute-dist"]["winner"] in said
    text = (root / "demo" / "recommend" / "recommend.md").read_text()
    assert "## commute (classify; macro-F1)" in text and "Held-out records per perspective" in text
    assert "## commute-dist (distribution; JSD)" in (root / "rec" / "recommend.md").read_text()
    table = (paths["results"] / "table.md").read_text()  # the demo evaluated the recommendation on the test split
    assert "## commute (classify)" in table and "steer-8x-fine" in table


def test_the_recommended_serve_config_answers_distribution(pipeline) -> None:
    from ray import serve

    from serve.app import run_serve

    _, _, paths, entries, _, _ = pipeline
    path = Path(entries["commute"]["serve_config"])
    assert path == paths["serve_config"] and path.is_file() and Path(entries["commute"]["vectors_file"]).is_file()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the registry the demo's vectors stage started is the one serve uses (as for a user running both)
    cfg = ServeConfig.load(path, [f"port={port}", "backend=fused", "replica_cpus=0.5", "aggregator_cpus=0.25"])
    assert cfg.perspectives == list(VIEWS)
    try:  # on the pipeline's Ray
        run_serve(cfg, block=False, echo=lambda _: None)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/distribution", headers={"Authorization": "Bearer k"},
                       json={"prompt": "Should the city build a tram line? Answer:", "options": ["A", "B"],
                             "backend": "fused"}, timeout=120)  # fmt: skip
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body["perspectives"]) == set(VIEWS) and abs(sum(body["combined"]["probs"]) - 1) < 1e-5
    finally:
        serve.shutdown()


def test_the_sweep_moves_sae_and_caa_over_layers_and_picks_per_task(pipeline) -> None:
    _, _, _, entries, _, (sweep_out, sweep) = pipeline
    assert sweep["layers"] == [9, 15]
    rows = [json.loads(line) for line in storage.read_text(storage.join(sweep_out, "sweep.jsonl")).splitlines()]
    seen = {(r["layer"], r["mode"], r["sae"], r["coeff"]) for r in rows if r["condition"] != "zero-shot"}
    # CAA only at sweep_layers, each SAE at its own layer (the sweep_saes entry labelled by expansion and layer)
    assert seen == {(9, "caa", None, 4.0), (9, "sae", "8x@L9", 4.0), (15, "sae", "8x", 4.0)}
    assert sweep["saes"]["8x@L9"]["layer"] == 9 and sweep["saes"]["8x"]["layer"] == 15
    steered = [r for r in rows if r["task"] == "commute-dist" and r["condition"] != "zero-shot"]
    top = max((r for r in steered if r["mode"] == "sae"), key=gain)  # the layer is picked by the held-out gain
    best = sweep["best"]["commute-dist"]
    assert best == {"mode": "sae", "sae": top["sae"], "layer": top["layer"], "coeff": 4.0, "gain": gain(top)}
    assert sweep["best"]["commute-dist/caa"]["layer"] == 9
    at_15 = next(r for r in steered if r["sae"] == "8x")
    recommended = next(r for r in entries["commute-dist"]["ranking"] if r["candidate"] == "steer-8x-fine c=4 @L15")
    assert gain(at_15) == pytest.approx(recommended["gain"], abs=1e-4)  # one engine, the same held-out records
    assert sweep["task_coeffs"] == {"commute-dist": 4.0}
    assert "| commute-dist |" in storage.read_text(storage.join(sweep_out, "sweep.md"))
    assert storage.read_json(storage.join(sweep_out, "sweep.json")) == json.loads(json.dumps(sweep))
