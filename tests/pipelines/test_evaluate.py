"""Evaluation on the embedded model with the TEST FIXTURE SAE (tests/sae_fixture.py): the model actor, and a
smoke run of every task under every condition through Ray (tiny limits; the fixture SAE fills both the 8x
and the 32x slot)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.eval_plan import ALL_CONDITIONS, KNOWN_CONDITIONS, SteerSpec, Switches, UnitBuilder, make_conditions
from pipelines.evaluate import EvalConfig, run_evaluate
from pipelines.prompts import build_prompt
from pipelines.recommend import run_recommend
from pipelines.tasks import BUNDLED, PROMPTS
from sae import storage
from sae.decoding import Decoding, plural_next_token
from sae.lm import model_name
from sae.model import WEIGHTS_FILE
from sae.readout import label_token_ids, option_probs
from sae.vectorset import VectorSet, VectorSetMeta, sae_fingerprint

TASKS = tuple(BUNDLED)


def _vector_set(model, sae, seed: int = 0) -> VectorSet:
    g = torch.Generator().manual_seed(seed)
    vectors = {p: torch.rand(sae.d_sae, generator=g) * (torch.rand(sae.d_sae, generator=g) < 0.01) for p in "ab"}
    meta = VectorSetMeta(
        model=model_name(model), layer=15, mode="sae", granularity="fine", task="mislc", n_samples={"a": 1, "b": 1},
        readout="last", dim=sae.d_sae, sae_fingerprint=sae_fingerprint(sae),
    )  # fmt: skip
    return VectorSet(vectors, meta)


def test_worker_rows_resume_exactly_and_pd_matches_the_fused_decoder(embedded, embedded_sae, data_root) -> None:
    from pipelines.eval_worker import EvalWorker

    model, tok = embedded
    vs = _vector_set(model, embedded_sae.sae)
    record = BUNDLED["mislc"].records("test", data_root)[0]
    prompt = build_prompt(tok, PROMPTS["mislc"], record)
    b = UnitBuilder(0, "mislc")
    spec = SteerSpec("8x-fine", "sae", 4.0)
    rows = [b.row(prompt, spec, p) for p in "ab"]
    b.output("steered-a", rows[:1], record.options)
    b.output("pd", rows, record.options, base=b.row(prompt), decoding={"mode": "dvd", "alpha": 0.2})
    b.output("plain", [b.row(prompt)], record.options)
    worker_spec = {"model": "embedded", "layer": 15, "saes": {"8x": str(embedded_sae.path)},
                   "vectors": {"mislc/8x-fine": vs.to_bytes()}, "threads": 2}  # fmt: skip
    resumed = EvalWorker(worker_spec)
    assert resumed.resume
    out = resumed.run_unit(b.unit)
    full = EvalWorker({**worker_spec, "resume": False}).run_unit(b.unit)
    assert out["stats"]["tokens_resumed"] > 0 and full["stats"]["tokens_resumed"] == 0
    for key in ("steered-a", "pd", "plain"):
        np.testing.assert_allclose(out["outputs"][key]["probs"], full["outputs"][key]["probs"], atol=1e-4)
    assert not np.allclose(out["outputs"]["steered-a"]["probs"], out["outputs"]["plain"]["probs"], atol=1e-3)
    enc = tok([prompt.text], return_tensors="pt", add_special_tokens=False)
    fused = plural_next_token(
        model, enc["input_ids"], enc["attention_mask"], vs, ["a", "b"], Decoding("dvd", alpha=0.2),
        embedded_sae.sae, coeff=4.0,
    )  # fmt: skip
    expected, _ = option_probs(fused, label_token_ids(tok, record.options))
    np.testing.assert_allclose(out["outputs"]["pd"]["probs"], expected[0].numpy(), atol=1e-4)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, embedded_sae):
    """One run of all tasks × every known condition (the default ones and the reference's pooled vectors):
    2 perspectives, 2 records each, 4 vector samples each."""
    import ray

    root = tmp_path_factory.mktemp("evaluate")
    cfg = EvalConfig.load(None, [
        f"sae_8x={embedded_sae.path}", f"sae_32x={embedded_sae.path}", "limit=2", "samples=4",
        "max_perspectives=2", "pd_k_classify=2", "pd_k_distribution=2", "bootstrap=200", "items_per_unit=16",
        f"out={root / 'results'}", f"work_dir={root / 'work'}", "coeff=4",
        f"conditions={json.dumps(list(KNOWN_CONDITIONS))}",
    ])  # fmt: skip
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        first = run_evaluate(cfg, echo=lambda _: None)
        lines: list[str] = []
        again = run_evaluate(cfg, echo=lines.append)
    finally:
        ray.shutdown()
    return cfg, first, again, lines


def test_smoke_run_scores_every_task_condition_and_perspective(smoke) -> None:
    cfg, first, _, _ = smoke
    rows = [json.loads(line) for line in (cfg.out / "rows.jsonl").read_text().splitlines()]
    assert rows == json.loads(json.dumps(first.rows))
    for task in TASKS:
        mine = [r for r in rows if r["task"] == task]
        assert {r["condition"] for r in mine} == set(KNOWN_CONDITIONS)
        pooled = [r for r in mine if r["perspective"] == "all"]
        assert len(pooled) == len(KNOWN_CONDITIONS) and all(r["n"] == 4 for r in pooled)
        assert len(mine) == 3 * len(KNOWN_CONDITIONS)  # two perspectives + pooled
        primary = "macro_f1" if task in ("crehate", "mislc") else "jsd"
        for r in pooled:
            assert r[f"{primary}_lo"] <= r[primary] + 1e-12 and r[primary] <= r[f"{primary}_hi"] + 1e-12
            assert (f"{primary}_delta" in r) == (r["condition"] != "zero-shot")
    table = (cfg.out / "table.md").read_text()
    assert all(f"## {t} " in table for t in TASKS) and "## The paper's findings" in table
    assert all((cfg.out / f"{t}-conditions.png").stat().st_size > 1000 for t in TASKS)
    run = json.loads((cfg.out / "run.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    assert run["git"]["commit"] == head.stdout.strip() and run["sizes"]["crehate"]["evaluated"]
    assert EvalConfig.load(cfg.out / "config.yaml").to_dict() == cfg.to_dict()
    assert list((cfg.work / "wandb").glob("offline-run-*"))


def test_the_task_registry_gives_the_rows_of_before_it(smoke) -> None:
    """The four bundled tasks through the task registry and the shared engine give exactly the rows the code
    before them gave on this slice (golden file written by that code, commit 4e7409c, same fixture and seed).

    The rows of SAE-steered conditions depend on the fixture SAE, which each machine trains from its own fp32
    activations: a CPU that rounds differently trains another SAE (three machines so far, three SAEs; 4e7409c
    run on the machine that wrote this file gives it bit for bit). So the file records the SAE it was written
    with: on a machine that trained that SAE every row is compared, elsewhere the rows that do not use an SAE
    (zero-/few-shot, persona PD, CAA: 72 of the 192) are, and the test says which. To compare everything on a
    new machine, run 4e7409c's smoke fixture there and keep its rows.jsonl."""
    cfg, first, _, _ = smoke
    doc = json.loads((Path(__file__).parent / "golden" / "evaluate-smoke-rows.json").read_text())
    golden = doc["rows"]
    keys = set().union(*golden)  # later code adds metrics (top1_*) and conditions (*-pooled); the rest is equal
    rows = [{k: v for k, v in r.items() if k in keys} for r in first.rows if r["condition"] in ALL_CONDITIONS]
    rows = json.loads(json.dumps(rows, sort_keys=True))
    assert [(sorted(r), r["task"], r["condition"], r["perspective"]) for r in rows] == [
        (sorted(g), g["task"], g["condition"], g["perspective"]) for g in golden
    ]
    fixture = hashlib.sha256((cfg.sae_8x / WEIGHTS_FILE).read_bytes()).hexdigest()
    sae_free = {c.name for c in make_conditions(ALL_CONDITIONS, Switches()) if c.steer is None or c.steer.sae is None}
    same_sae = fixture == doc["fixture_sae_sha256"]
    pairs = [(r, g) for r, g in zip(rows, golden, strict=True) if same_sae or g["condition"] in sae_free]
    print(f"golden rows compared: {len(pairs)} of {len(golden)}" + ("" if same_sae else (
        f" (this machine trained another fixture SAE, {fixture[:12]} vs {doc['fixture_sae_sha256'][:12]}: "
        f"the rows of the conditions without an SAE, {sorted(sae_free)})")))  # fmt: skip
    assert len(pairs) >= 72
    # more conditions make more rows per item, so units hold other items and prompts share padded batches with
    # other prompts: fp32 results move in the 6th-7th digit (also across machines), and the bootstrap bounds
    # of a paired difference of two ~0.01 JSDs move by ~1e-6 absolute (measured 1.2e-6 on the CI machine)
    for r, g in pairs:
        where = (r["task"], r["condition"], r["perspective"])
        for key, want in g.items():
            if isinstance(want, float):
                assert r[key] == pytest.approx(want, rel=1e-4, abs=1e-5, nan_ok=True), (*where, key)
            else:
                assert r[key] == want, (*where, key)


def test_top1_metrics_are_those_of_the_recorded_top1_labels(smoke) -> None:
    """Classification rows carry the reference's top-1 readout beside the label mass; its micro-F1 is the
    share of records whose top-1 token spells the gold label (recomputed from predictions.jsonl)."""
    cfg, first, _, _ = smoke
    preds = [json.loads(line) for line in (cfg.out / "predictions.jsonl").read_text().splitlines()]
    for task in ("crehate", "mislc"):
        for row in [r for r in first.rows if r["task"] == task and r["perspective"] == "all"]:
            mine = [p for p in preds if p["task"] == task and p["condition"] == row["condition"]]
            assert len(mine) == row["n"] and all(-1 <= p["top1"] < len(p["probs"]) for p in mine)
            hits = np.mean([p["top1"] == p["gold"] for p in mine])
            assert row["top1_micro_f1"] == pytest.approx(hits)
            assert row["top1_micro_f1_lo"] <= row["top1_micro_f1"] + 1e-12
    assert not any("top1" in p for p in preds if p["task"] == "globalopinionqa")
    assert "top-1 macro-F1" in (cfg.out / "table.md").read_text()


def test_pooled_vectors_steer_every_perspective_with_one_vector(smoke) -> None:
    """steer-*-pooled: one vector from the first training items over all perspectives (the reference's
    GlobalOpinionQA rule), the same for every perspective, unlike the per-perspective fine vectors."""
    cfg, _, _, _ = smoke
    for task in TASKS:
        pooled = VectorSet.load(cfg.work / "vectors" / f"{task}-8x-pooled-L15.safetensors")
        fine = VectorSet.load(cfg.work / "vectors" / f"{task}-8x-fine-L15.safetensors")
        assert set(pooled.vectors) == set(fine.vectors) and len(pooled.vectors) == 2
        first, second = pooled.vectors.values()
        assert torch.equal(first, second) and float(first.abs().sum()) > 0
        assert pooled.meta.extra["sampling"] == "pooled" and fine.meta.extra["sampling"] == "perspective"
        assert not all(torch.equal(first, v) for v in fine.vectors.values())


def test_smoke_run_conditions_behave_as_their_math_says(smoke) -> None:
    cfg, _, _, _ = smoke
    preds: dict[tuple[str, str], list[float]] = {}
    for line in (cfg.out / "predictions.jsonl").read_text().splitlines():
        p = json.loads(line)
        preds[(p["condition"], f"{p['task']}|{p['id']}")] = p["probs"]
    keys = sorted({k for _, k in preds})

    def probs(condition: str) -> np.ndarray:
        return np.concatenate([preds[(condition, k)] for k in keys])

    # keep_error=True with a linear decoder: SAE steering equals adding v W_dec to the residual
    np.testing.assert_allclose(probs("steer-8x-fine"), probs("residual-8x-fine"), atol=2e-3)
    np.testing.assert_allclose(probs("steer-8x-fine"), probs("steer-32x-fine"), atol=1e-6)  # same SAE in both slots
    assert np.abs(probs("steer-8x-fine") - probs("zero-shot")).max() > 0.01  # steering acts
    assert np.abs(probs("steer-8x-fine") - probs("ref-steer-8x-fine")).max() > 0.01  # so does dropping the error


def test_a_rerun_reuses_every_finished_unit(smoke) -> None:
    _, first, again, lines = smoke
    assert any("0 to run" in line for line in lines)
    assert again.rows == first.rows


def test_a_rerun_in_a_new_process_reuses_every_unit_and_writes_to_s3_whole(smoke, s3_bucket) -> None:
    """The resume users run: the same config in a fresh process (no Ray yet: it once crashed asking Ray for
    its nodes before anything had started it), every readout and unit reused, with ``out: s3://…``: every
    output on the (real, local) S3 server, each object whole — the same rows and predictions as on local
    disk, plots, a run.json with the same plan."""
    cfg, _, _, _ = smoke
    uri = f"{s3_bucket}/results"  # the same last part: the same run name
    exe = shutil.which("pluristeer") or str(Path(sys.executable).parent / "pluristeer")
    rerun = subprocess.run(
        [exe, "evaluate", "--config", str(cfg.out / "config.yaml"), "--set", f"out={uri}", "--set", "track=false"],
        capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert "already done, 0 to run" in rerun.stdout
    assert set(storage.listdir(uri)) == {p.name for p in cfg.out.iterdir()}
    for name in ("rows.jsonl", "predictions.jsonl"):
        assert storage.read_bytes(storage.join(uri, name)) == (cfg.out / name).read_bytes(), name
    assert all(storage.read_bytes(storage.join(uri, f"{t}-conditions.png"))[:4] == b"\x89PNG" for t in TASKS)
    run, local = storage.read_json(storage.join(uri, "run.json")), json.loads((cfg.out / "run.json").read_text())
    assert run["plan_hash"] == local["plan_hash"] and run["git"] == local["git"]
    assert EvalConfig.load(None, [f"out={uri}"]).work == Path("runs/evaluate/results")  # the URI's last part


def test_cli_reports_config_errors_and_plans_a_dry_run(embedded_sae, tmp_path) -> None:
    exe = shutil.which("pluristeer") or str(Path(sys.executable).parent / "pluristeer")
    env = {**os.environ, "COLUMNS": "200"}
    bad = subprocess.run([exe, "evaluate", "--set", "tasks=nope"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "tasks: 'nope' is neither a bundled" in bad.stderr and "Traceback" not in bad.stderr
    missing = subprocess.run([exe, "evaluate", "--limit", "1"], capture_output=True, text=True, env=env)
    assert missing.returncode == 2 and "sae_8x: not set" in missing.stderr
    plan = subprocess.run(
        [exe, "evaluate", "--dry-run", "--limit", "1", "--set", f"sae_8x={embedded_sae.path}",
         "--set", f"sae_32x={embedded_sae.path}", "--set", "tasks=mislc", "--set", f"out={tmp_path / 'r'}"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert plan.returncode == 0, plan.stderr
    assert "mislc: " in plan.stdout and "full-forward tokens" in plan.stdout and not (tmp_path / "r").exists()
    # the sweep and recommend plan every layer and run nothing either (the sweep once ran whole on --dry-run)
    common = [f"sae_8x={embedded_sae.path}", "tasks=[mislc]", "sweep_layers=[9]", "sweep_coeffs=[1.0]",
              "sweep_limit=2", f"out={tmp_path / 's'}", f"work_dir={tmp_path / 'w'}"]  # fmt: skip
    sweep = subprocess.run(
        [exe, "evaluate", "--sweep", "--dry-run", *[a for c in common for a in ("--set", c)]],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert sweep.returncode == 0, sweep.stderr
    assert "sweep: layer 9: " in sweep.stdout and "sweep: layer 15: " in sweep.stdout, sweep.stdout
    planned = run_recommend(EvalConfig.load(None, [*common, "dry_run=true"]), echo=lambda _: None)
    assert set(planned["planned_tokens"]) == {9, 15} and planned["planned_tokens"][15]["resumed"] > 0
    assert not (tmp_path / "s").exists() and not (tmp_path / "w").exists()
