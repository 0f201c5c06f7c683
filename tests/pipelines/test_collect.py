from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from common.config import ConfigError
from pipelines.collect import CollectConfig, collect
from pipelines.collect_worker import select_positions
from pipelines.contexts import plan_contexts
from pipelines.corpus import iter_documents
from pipelines.records import DataError
from pipelines.store import ActivationStore, StoreError, read_manifest
from sae.hooks import residuals
from sae.lm import load_lm, load_tokenizer
from tests.conftest import content_hash

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def local_ray():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _cfg(model: Path, out: Path, data_root: Path, **kw) -> CollectConfig:
    base = {
        "model": str(model),
        "layers": [1, 3],
        "context_size": 32,
        "n_tokens": 500,
        "batch_size": 2,
        "contexts_per_shard": 4,  # 124 rows per full shard
        "store_dtype": "float32",
        "out": out,
        "corpus": data_root / "corpus",
        "sources": ["ag_news"],
        "torch_threads": 1,
        "track": False,
    }
    return CollectConfig.from_dict({**base, **kw})


def _by_position(store: ActivationStore, layer: int) -> dict[tuple[int, int], np.ndarray]:
    acts = store.read(layer).numpy()
    keys = zip(store.read_column("context").tolist(), store.read_column("position").tolist(), strict=True)
    return {k: acts[i] for i, k in enumerate(keys)}


def test_contexts_are_packed_deterministically() -> None:
    tok = load_tokenizer("embedded")
    docs = ["The cat sat on the mat. " * 5, "A second, shorter document.", "Third one here. " * 9]
    plan = plan_contexts(tok, docs, 16, 100)
    stream = np.concatenate([[*tok(d, add_special_tokens=False)["input_ids"], tok.eos_token_id] for d in docs])
    assert plan.shape == (len(stream) // 15, 16) and plan.dtype == np.int32
    assert (plan[:, 0] == tok.bos_token_id).all() and tok.bos_token_id == 1
    np.testing.assert_array_equal(plan[:, 1:].reshape(-1), stream[: plan.shape[0] * 15])  # docs joined by EOS
    np.testing.assert_array_equal(plan_contexts(tok, docs, 16, 2), plan[:2])  # prefix-stable


def test_select_positions_drops_bos_and_outliers() -> None:
    norms = torch.ones(2, 6, 2)
    norms[0, 3, 1] = 50.0  # an outlier at one layer only
    norms[1, 0, :] = 100.0  # a BOS-sized norm at position 0
    keep, outliers = select_positions(norms, 10.0)
    assert outliers == 1 and not keep[:, 0].any() and not keep[0, 3] and keep.sum() == 9
    keep_all, none = select_positions(norms, 0.0)
    assert none == 0 and keep_all.sum() == 10


def test_config_is_validated() -> None:
    cfg = CollectConfig.load(None, ["dtype=bf16", "store_dtype=fp32", "layers=3,9", "actor_resources={gpu_a: 1}"])
    assert cfg.dtype == "bfloat16" and cfg.store_dtype == "float32" and cfg.layers == [3, 9]
    for bad, message in [
        ("layers=[2, 2]", "duplicates"),
        ("n_tokens=0", "n_tokens: must be >= 1, got 0"),
        ("sources=books", "unknown"),
        ("context_size=1", "context_size"),
    ]:
        with pytest.raises(ConfigError, match=message):
            CollectConfig.load(None, [bad])


def test_two_layers_in_one_pass_equal_single_layer_runs(local_ray, tiny_lm_dir, data_root, tmp_path) -> None:
    both = collect(_cfg(tiny_lm_dir, tmp_path / "both", data_root))
    store = ActivationStore(tmp_path / "both")
    store.verify()
    m = store.manifest
    assert m.complete and len(store) == 500 and m.rows == 500 and m.layers == [1, 3] and m.d_model == 64
    assert [s.rows for s in m.shards] == [124, 124, 124, 124, 4]  # the last shard truncated to 500 exactly
    assert m.positions_dropped["bos"] == 17 and m.positions_dropped["outlier"] == 0
    assert not (store.read_column("position") == 0).any()
    assert sorted(both.computed) == [0, 1, 2, 3, 4] and not list(tmp_path.glob("both/.*tmp"))
    for layer in (1, 3):
        acts = store.read(layer).numpy().astype(np.float64)
        np.testing.assert_allclose(store.stats(layer)["mean"], acts.mean(0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(store.stats(layer)["mean_norm"], np.linalg.norm(acts, axis=1).mean(), rtol=1e-6)
        single_dir = tmp_path / f"only{layer}"
        collect(_cfg(tiny_lm_dir, single_dir, data_root, layers=[layer]))
        single = _by_position(ActivationStore(single_dir), layer)
        paired = _by_position(store, layer)
        assert single.keys() == paired.keys()
        for key, value in paired.items():
            np.testing.assert_array_equal(value, single[key])

    # The rows are the model's residuals at those positions (checked against a direct forward).
    model, tok = load_lm(str(tiny_lm_dir))
    ids = plan_contexts(tok, iter_documents(data_root / "corpus", ["ag_news"]), 32, 2)
    direct = residuals(model, [3], torch.from_numpy(ids).long())[3]
    rows = _by_position(store, 3)
    got = np.stack([rows[(1, p)] for p in range(1, 32)])
    np.testing.assert_allclose(got, direct[1, 1:].numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.fault
def test_killed_actor_is_replaced_and_its_shard_retried(local_ray, tiny_lm_dir, data_root, tmp_path) -> None:
    cfg = _cfg(tiny_lm_dir, tmp_path / "store", data_root, n_tokens=3000, batch_size=1)
    outcome: dict[str, object] = {}
    runner = threading.Thread(target=lambda: outcome.update(result=collect(cfg, echo=lambda _: None)))
    runner.start()
    killed = None
    deadline = time.time() + 120
    while killed is None and time.time() < deadline and runner.is_alive():
        manifest = cfg.out / "manifest.json"
        if manifest.exists() and len(read_manifest(cfg.out).shards) >= 2:
            for proc in psutil.Process().children(recursive=True):
                if "ResidualWorker" in " ".join(proc.cmdline()):
                    proc.send_signal(signal.SIGKILL)
                    killed = proc.pid
        time.sleep(0.02)
    runner.join(timeout=180)
    assert killed is not None, "the run finished before an actor could be killed"
    result = outcome["result"]
    pids = {t["pid"] for t in result.shard_times}
    assert killed in pids and len(pids) >= 2  # a replacement actor finished the work
    reference = collect(_cfg(tiny_lm_dir, tmp_path / "ref", data_root, n_tokens=3000, batch_size=1))
    assert len(ActivationStore(cfg.out)) == len(ActivationStore(reference.out)) == 3000
    assert content_hash(cfg.out) == content_hash(reference.out)


@pytest.mark.fault
def test_killed_driver_resumes_to_the_same_store(local_ray, tiny_lm_dir, data_root, tmp_path) -> None:
    cfg = _cfg(tiny_lm_dir, tmp_path / "store", data_root, n_tokens=4000, batch_size=1)
    path = tmp_path / "collect.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, killed with it
    env.update(PYTHONPATH=str(REPO), WANDB_MODE="disabled")
    command = [sys.executable, "-m", "pluristeer.cli", "collect", "--config", str(path)]
    driver = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and driver.poll() is None:
            if (cfg.out / "manifest.json").exists() and len(read_manifest(cfg.out).shards) >= 3:
                break
            time.sleep(0.02)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started
        driver.wait()
    before = read_manifest(cfg.out)
    assert not before.complete and len(before.shards) >= 3, driver.stdout.read().decode()[-2000:]

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "4,000 tokens" in rerun.stdout and f"{len(before.shards)} reused" in rerun.stdout
    after = read_manifest(cfg.out)
    kept = {s.index: s.sha256 for s in after.shards}
    assert all(kept[s.index] == s.sha256 for s in before.shards if s.index < len(after.shards) - 1)

    reference = collect(_cfg(tiny_lm_dir, tmp_path / "ref", data_root, n_tokens=4000, batch_size=1))
    assert after.rows == reference.manifest.rows == 4000 and after.complete
    assert content_hash(cfg.out) == content_hash(reference.out)
    assert sorted(p.name for p in cfg.out.iterdir()) == sorted(p.name for p in reference.out.iterdir())


def test_resume_refuses_other_settings_and_cli_errors_are_clear(tiny_lm_dir, data_root, tmp_path) -> None:
    from pipelines.store import Manifest, StoreWriter

    cfg = _cfg(tiny_lm_dir, tmp_path / "s", data_root)
    StoreWriter(cfg.out, Manifest("x", [1, 3], 64, "float32", 32, config={**cfg.to_dict(), "outlier_factor": 5.0}))
    with pytest.raises(StoreError, match="outlier_factor: 5.0 -> 10.0"):
        collect(cfg)
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "a.txt").write_text("Too little text for five hundred tokens.")
    with pytest.raises(DataError, match="yields 0 contexts"):
        collect(_cfg(tiny_lm_dir, tmp_path / "s2", data_root, corpus=tmp_path / "small"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "pluristeer.cli", "collect", "--set", f"model={tiny_lm_dir}", "--set", "layers=7"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2 and "layers: [7] out of range" in proc.stderr and "Traceback" not in proc.stderr


def test_embedded_small_slice(local_ray, embedded, data_root, tmp_path) -> None:
    """The real model at layer 15, fp16 store: shape, dtype, count, statistics, W&B run, readers."""
    cfg = CollectConfig.from_dict(
        {
            "model": "embedded",
            "layers": [15],
            "context_size": 64,
            "n_tokens": 400,
            "contexts_per_shard": 4,
            "batch_size": 4,
            "out": tmp_path / "store",
            "corpus": data_root / "corpus",
            "track": True,
        }
    )
    result = collect(cfg, echo=lambda _: None)
    store = ActivationStore(cfg.out)
    store.verify()
    assert store.manifest.model == "embedded:SmolLM2-135M-Instruct" and store.manifest.dtype == "float16"
    assert len(store) == 400 and store.read(15).shape == (400, 576)
    assert str(pq.read_schema(cfg.out / store.manifest.shards[0].name).field("layer_15").type.value_type) == "halffloat"
    dropped, contexts = store.manifest.positions_dropped, store.read_column("context")
    covered = int(contexts[-1]) * 64 + int(store.read_column("position")[-1]) + 1  # positions up to the last row
    assert dropped["bos"] == len(np.unique(contexts)) and dropped["bos"] + dropped["outlier"] + 400 == covered
    stats = store.stats(15)
    norms = store.read(15).double().norm(dim=1)
    assert len(stats["mean"]) == len(stats["std"]) == 576 and stats["n"] == 400
    assert stats["mean_norm"] == pytest.approx(norms.mean().item(), rel=1e-6)
    assert norms.max() < 10 * norms.median()  # the attention-sink outliers are gone
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no W&B run was written"
    assert result.bytes_per_token > 576 * 2 * 0.8

    model, tok = embedded
    ids = plan_contexts(tok, iter_documents(data_root / "corpus"), 64, 1)
    direct = residuals(model, [15], torch.from_numpy(ids).long())[15][0]
    rows = _by_position(store, 15)
    kept = [p for p in range(1, 64) if (0, p) in rows]
    got = torch.from_numpy(np.stack([rows[(0, p)] for p in kept]))
    torch.testing.assert_close(got, direct[kept].half().float(), rtol=2e-2, atol=2e-2)

    batches = list(store.iter_batches(15, 64, shuffle_window=128, seed=1, rank=1, world_size=3))
    assert len(batches) == store.batches_per_epoch(64, world_size=3) == 2 and batches[0].dtype == torch.float32
    torch_batch = next(iter(store.ray_dataset().iter_torch_batches(batch_size=32, local_shuffle_buffer_size=64)))
    assert torch_batch["layer_15"].shape == (32, 576)


def test_auto_store_dtype_follows_the_measured_range_and_survives_resume(
    local_ray, tiny_lm_dir, huge_lm_dir, data_root, tmp_path
) -> None:
    small = collect(_cfg(tiny_lm_dir, tmp_path / "small", data_root, store_dtype="auto", layers=[3]), echo=print)
    assert small.manifest.dtype == "float16" and small.manifest.dtype_choice["chosen"] == "float16"
    assert small.manifest.dtype_choice["max_abs"]["3"] * 4 < 65504

    lines: list[str] = []
    cfg = _cfg(huge_lm_dir, tmp_path / "huge", data_root, store_dtype="auto", layers=[1, 3])
    first = collect(cfg, echo=lines.append)
    m = first.manifest
    assert m.dtype == "float32" and m.dtype_choice["max_abs_all"] > 65504 / 4
    assert any("store_dtype auto -> float32" in line for line in lines)
    store = ActivationStore(cfg.out)
    acts = store.read(3).numpy()
    assert np.isfinite(acts).all() and np.abs(acts).max() > 65504  # would have been inf in float16
    assert str(pq.read_schema(cfg.out / m.shards[0].name).field("layer_3").type.value_type) == "float"

    # Resume: a store cut back to its first two shards keeps the recorded dtype and does not probe again.
    from pipelines.store import StoreWriter

    writer = StoreWriter(cfg.out, read_manifest(cfg.out))
    writer.forget([s.index for s in m.shards if s.index >= 2], save=False)
    writer.manifest.complete = False
    writer._save()
    lines.clear()
    again = collect(cfg, echo=lines.append)
    assert again.skipped == [0, 1] and again.manifest.dtype == "float32" and again.manifest.complete
    assert again.manifest.dtype_choice == m.dtype_choice and not any("store_dtype auto" in x for x in lines)
    assert content_hash(cfg.out) == content_hash(first.out)
    # auto means "the dtype the store holds": naming it explicitly (or auto on an explicit store) still resumes.
    explicit = collect(_cfg(huge_lm_dir, cfg.out, data_root, store_dtype="float32", layers=[1, 3]), echo=print)
    assert explicit.manifest.complete and explicit.computed == []
    with pytest.raises(StoreError, match="store_dtype: 'float32' -> 'float16'"):
        collect(_cfg(huge_lm_dir, cfg.out, data_root, store_dtype="float16", layers=[1, 3]))


def test_explicit_float16_overflow_fails_naming_layer_value_and_fix(
    local_ray, huge_lm_dir, data_root, tmp_path
) -> None:
    cfg = _cfg(huge_lm_dir, tmp_path / "fp16", data_root, store_dtype="float16", layers=[3])
    with pytest.raises(StoreError) as info:
        collect(cfg, echo=lambda _: None)
    message = str(info.value)
    assert "layer 3" in message and "max |value|" in message and "--set store_dtype=float32" in message
    assert not list(cfg.out.glob("shard-*.parquet"))  # nothing with inf was written
    assert read_manifest(cfg.out).shards == []
