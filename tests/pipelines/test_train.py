from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from common.config import ConfigError
from pipelines.contexts import plan_contexts
from pipelines.corpus import iter_documents
from pipelines.store import ActivationStore, StoreError
from pipelines.train import (
    TrainConfig,
    TrainResult,
    check_store_finite,
    evaluate_saes,
    flag_metrics,
    heldout_input_ids,
    run_train,
    stream_batches,
)
from sae.atomic import sha256_file
from sae.model import SAEConfig, SparseAutoencoder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never another's Ray
    yield
    ray.shutdown()


def _cfg(store: Path, out: Path, **kw) -> TrainConfig:
    base = {
        "store": str(store),
        "expansions": [4, 8],
        "k": 4,
        "lr": 3e-3,
        "batch_size": 512,
        "epochs": 1,
        "workers": 2,
        "checkpoint_every": 10,
        "log_every": 5,
        "out": str(out),
        "eval_tokens": 0,
        "track": False,
        "dead_tokens": 2048,
    }
    return TrainConfig.from_dict({**base, **kw})


def test_config_errors_name_the_field(tiny_store: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="zero_stage"):
        _cfg(tiny_store, tmp_path, zero_stage=3)
    with pytest.raises(ConfigError, match="divisible by workers"):
        _cfg(tiny_store, tmp_path, batch_size=513)
    with pytest.raises(ConfigError, match=r"saes\[0\]"):
        _cfg(tiny_store, tmp_path, saes=[{"expansion": 8, "width": 3}])
    with pytest.raises(ConfigError, match="architecture"):
        _cfg(tiny_store, tmp_path, architecture="gated")
    cfg = _cfg(tiny_store, tmp_path, saes=[{"expansion": 2, "architecture": "relu"}, {"d_sae": 100, "k": 3}])
    assert [s.label(32) for s in cfg.specs()] == ["relu-2x", "topk-100-k3"]
    with pytest.raises(ConfigError, match="less than one per-worker batch"):
        run_train(_cfg(tiny_store, tmp_path, workers=2, batch_size=16384))


def test_stream_resumes_where_it_left_off(tiny_store: Path, tmp_path: Path) -> None:
    store = ActivationStore(tiny_store)
    cfg = _cfg(tiny_store, tmp_path, shuffle_window=1024)
    full = stream_batches(store, 3, 256, cfg, rank=1, world=2)
    seen = [next(full) for _ in range(20)]  # crosses into the second epoch (16 batches per epoch)
    skipped = stream_batches(store, 3, 256, cfg, rank=1, world=2, skip=13)
    for want in seen[13:]:
        torch.testing.assert_close(next(skipped), want)
    assert not torch.equal(seen[0], seen[16])  # epoch 2 is reshuffled


def test_heldout_text_is_the_tail_of_the_corpus(tmp_path: Path) -> None:
    from sae.lm import load_tokenizer

    for i in range(30):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"Document number {i}. " * 40)
    tokenizer = load_tokenizer("embedded")
    ids = heldout_input_ids(tokenizer, tmp_path, 200, 64)
    assert ids.shape == (4, 64) and (ids[:, 0] == tokenizer.bos_token_id).all()  # packed as collection packs
    text = tokenizer.decode(ids[-1])
    assert "Document number 29" in text and "Document number 0." not in tokenizer.decode(ids.flatten())
    after = heldout_input_ids(tokenizer, tmp_path, 100, 64, skip_contexts=3)
    planned = plan_contexts(tokenizer, iter_documents(tmp_path), 64, 5)  # what collection plans (one packer)
    assert after.tolist() == planned[3:5].tolist()


def test_evaluate_saes_reports_reconstruction_and_ce(tiny_llama) -> None:
    torch.manual_seed(0)
    ids = torch.randint(3, 256, (3, 16))
    saes = {"a": SparseAutoencoder(SAEConfig(d_in=64, d_sae=128, k=8)), "b": SparseAutoencoder(SAEConfig(64, 256))}
    out = evaluate_saes(tiny_llama, saes, 1, ids)
    for m in out.values():
        assert m["tokens"] == 3 * 15 and m["l0"] <= 32
        assert {"mse", "explained_variance", "dead_fraction", "ce_loss_recovered"} <= set(m)
    assert out["a"]["ce_clean"] == out["b"]["ce_clean"]


def _check_outputs(result: TrainResult, store: Path) -> None:
    from sae_lens import SAE

    assert set(result.sae_dirs) == {"topk-4x-k4", "topk-8x-k4"}
    x = ActivationStore(store).read(3, limit=32)
    for name, path in result.sae_dirs.items():
        training = json.loads((path / "training.json").read_text())
        assert training["store"]["manifest_sha256"] == sha256_file(store / "manifest.json")
        assert training["steps"] == result.steps and training["config"]["k"] == 4
        assert 0 < training["final_metrics"]["train"]["explained_variance"] <= 1
        ours = SparseAutoencoder.load(path)
        theirs = SAE.load_from_disk(str(path))
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), ours(x), atol=1e-4, rtol=1e-4)
        assert ours.cfg.metadata["hook_name"] == "blocks.3.hook_resid_post", name


def test_ray_train_with_two_ddp_workers_completes_with_a_checkpoint(
    ray_cluster, tiny_store: Path, tmp_path: Path
) -> None:
    result = run_train(_cfg(tiny_store, tmp_path, track=True))
    assert result.checkpoint is not None and Path(result.checkpoint).is_dir()
    assert result.steps == 8192 // 512 and result.tokens == result.steps * 512
    assert result.report["resumed_from_step"] == 0 and result.report["tokens_per_s"] > 0
    _check_outputs(result, tiny_store)
    assert list((tmp_path / "wandb").glob("offline-run-*")), "rank 0 logged to W&B (offline)"


@pytest.mark.fault
def test_deepspeed_zero2_run_resumes_after_a_worker_is_killed(ray_cluster, tiny_store: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_store, tmp_path, deepspeed=True, zero_stage=2, checkpoint_every=5, inject_failure_at_step=12)
    result = run_train(cfg)
    assert result.report["resumed_from_step"] == 10  # the last checkpoint before the kill, not step 0
    assert result.steps == 16
    _check_outputs(result, tiny_store)


def test_cli_train_reports_config_errors_without_a_traceback(tiny_store: Path, tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(f"store: {tiny_store}\nexpansions: [4]\nk: 4\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "pluristeer.cli", "train", "--config", str(config)]
    proc = subprocess.run(
        [*cli, "--set", "workers=2", "--set", "batch_size=16384"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert proc.returncode == 2 and "less than one per-worker batch" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['wrkers'\]"):
        TrainConfig.load(config, ["wrkers=2"])


def _latest_step(snapshot: Path) -> dict | None:
    """The metrics of the newest checkpoint Ray Train recorded for a run (None before the first one)."""
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being rewritten
        return None
    return latest["metrics"] if latest else None


@pytest.mark.fault
def test_killed_driver_resumes_from_its_last_checkpoint(ray_cluster, tiny_store: Path, tmp_path: Path) -> None:
    """SIGKILL `pluristeer train` (the driver and the Ray it started) once the run has recorded checkpoints;
    rerunning the same command resumes from the newest one and ends with the same SAE, bit for bit, as an
    uninterrupted run, so no step was lost or done twice."""
    small = {"expansions": [4], "batch_size": 128, "epochs": 1, "workers": 1, "cpus_per_worker": 0.5,
             "checkpoint_every": 8, "log_every": 8}  # fmt: skip
    cfg = _cfg(tiny_store, tmp_path / "killed", **small)
    total = 8192 // 128
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, killed with it
    env.update(PYTHONPATH=str(REPO), WANDB_MODE="disabled")
    command = [sys.executable, "-m", "pluristeer.cli", "train", "--config", str(path)]
    snapshot = cfg.out / "ray" / cfg.run_name(3) / "checkpoint_manager_snapshot.json"
    driver = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and driver.poll() is None:
            if (_latest_step(snapshot) or {}).get("step", 0) >= 16:
                break
            time.sleep(0.05)
    finally:  # the driver and every process of the Ray it started (raylet, GCS, controller, worker) at once
        procs = [psutil.Process(driver.pid), *psutil.Process(driver.pid).children(recursive=True)]
        os.killpg(driver.pid, signal.SIGKILL)
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(procs, timeout=60)
        driver.wait()
    log = driver.stdout.read().decode()[-3000:] if driver.stdout else ""
    killed_at = (_latest_step(snapshot) or {}).get("step", 0)
    time.sleep(2)
    assert (_latest_step(snapshot) or {}).get("step", 0) == killed_at, "something of the killed run still wrote"
    assert 16 <= killed_at < total, log
    assert not list(cfg.out.glob("L3-*")), "the killed run must not have exported SAEs"

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert f"trained {total} steps, {total * 128} tokens" in rerun.stdout
    final = _latest_step(snapshot)
    assert final is not None and final["step"] == total and final["resumed_from_step"] == killed_at
    assert final["tokens"] == total * 128  # the token count continued from the checkpoint, not from 0

    reference = run_train(_cfg(tiny_store, tmp_path / "reference", **small))
    assert reference.steps == total and reference.report["resumed_from_step"] == 0
    resumed = SparseAutoencoder.load(cfg.out / "L3-topk-4x-k4")
    uninterrupted = SparseAutoencoder.load(reference.sae_dirs["topk-4x-k4"])
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, uninterrupted.state_dict()[name]), name


def _poison(store_dir: Path, shard: int, layer: int = 3) -> None:
    """Rewrite one shard of a store with an inf entry (as an older pluristeer's float16 store could hold),
    footer statistics recomputed from the values as collection computes them."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.store import SHARD_METADATA_KEY, RunningStats, layer_column, read_shard_metadata

    path = store_dir / f"shard-{shard:05d}.parquet"
    table = pq.read_table(path)
    column = layer_column(layer)
    values = table.column(column).combine_chunks()
    rows = values.values.to_numpy().reshape(len(table), -1).copy()
    rows[5, 2] = np.inf
    meta = read_shard_metadata(path)
    stats = RunningStats(rows.shape[1])
    stats.update(rows)
    meta["stats"] = {str(layer): stats.state()}
    flat = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), rows.shape[1])
    table = table.set_column(table.schema.get_field_index(column), column, flat)
    table = table.replace_schema_metadata({SHARD_METADATA_KEY: json.dumps(meta)})
    pq.write_table(table, path)


def test_store_with_non_finite_rows_is_refused_naming_the_shard(tmp_path: Path) -> None:
    from tests.conftest import synthetic_store

    root = synthetic_store(tmp_path / "store")
    _poison(root, 2)
    store = ActivationStore(root)
    with pytest.raises(StoreError, match=r"shard-00002\.parquet: layer 3 holds non-finite"):
        check_store_finite(store, 3)
    with pytest.raises(StoreError, match=r"shard-00002\.parquet"):  # before Ray starts
        run_train(_cfg(root, tmp_path / "out", workers=1))
    with pytest.raises(StoreError, match=r"shard-00002\.parquet: column layer_3 holds 1 non-finite"):
        list(store.iter_batches(3, 512))  # the readers check every batch too
    assert not (tmp_path / "out" / "ray").exists()


def test_forced_nan_batch_stops_training_exits_non_zero_and_exports_nothing(
    ray_cluster, tiny_store: Path, tmp_path: Path
) -> None:
    import ray

    cfg = _cfg(tiny_store, tmp_path / "out", expansions=[4], workers=1, cpus_per_worker=0.5, checkpoint_every=5,
               inject_nan_at_step=12)  # fmt: skip
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    address = ray.get_runtime_context().gcs_address  # join this test's Ray: one Ray per machine
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "pluristeer.cli", "train", "--config", str(path), "--address", address]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "training diverged at step 12: non-finite loss of SAE topk-4x-k4 (last finite loss topk-4x-k4: 0." in (
        proc.stderr
    ), proc.stderr[-2000:]
    assert "no SAE was exported" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(cfg.out.glob("L3-*"))  # nothing exported
    snapshot = cfg.out / "ray" / cfg.run_name(3) / "checkpoint_manager_snapshot.json"
    latest = _latest_step(snapshot)
    assert latest is not None and latest["step"] == 11 and "diverged" in latest  # the last finite state


def test_ce_loss_recovered_far_below_explained_variance_is_flagged() -> None:
    assert flag_metrics({"explained_variance": 0.82, "ce_loss_recovered": 0.985}) == []
    (warning,) = flag_metrics({"explained_variance": 0.66, "ce_loss_recovered": -0.004})
    assert "CE loss recovered -0.004 is far below explained variance 0.660" in warning
    assert flag_metrics({"explained_variance": float("nan"), "ce_loss_recovered": 0.1}) == []
    assert flag_metrics({}) == []
    huge = {"explained_variance": 0.873, "ce_loss_recovered": 0.955, "explained_variance_rest": 0.65,
            "dominant_dims": [163], "dominant_share": 0.6}  # fmt: skip
    (warning,) = flag_metrics(huge)  # Gemma 3 270M's layer 9 (issue 15): the EV is mostly one dimension's
    assert "dimension(s) [163] (60% of the variance)" in warning and "it is 0.650" in warning
    assert flag_metrics({**huge, "explained_variance_rest": 0.85}) == []


def test_model_with_residuals_beyond_float16_goes_through_collect_train_vectors(
    ray_cluster, huge_lm_dir: Path, data_root: Path, tmp_path: Path
) -> None:
    """Residual entries ~10^5 (beyond float16): store_dtype auto stores float32, the SAE trains on the data's
    own scale without NaN, and its vectors are finite (VectorSet refuses NaN)."""
    from pipelines.collect import CollectConfig, collect
    from pipelines.vectors import VectorConfig, run_vectors
    from sae.hooks import residuals
    from sae.lm import load_lm

    collected = collect(
        CollectConfig.from_dict(
            {
                "model": str(huge_lm_dir),
                "layers": [3],
                "context_size": 32,
                "n_tokens": 2048,
                "batch_size": 4,
                "contexts_per_shard": 16,
                "out": tmp_path / "store",
                "corpus": data_root / "corpus",
                "sources": ["ag_news"],
                "torch_threads": 1,
                "track": False,
            }
        ),
        echo=lambda _: None,
    )
    assert collected.manifest.dtype == "float32" and collected.manifest.dtype_choice["max_abs_all"] > 65504 / 4
    result = run_train(
        _cfg(
            tmp_path / "store",
            tmp_path / "train",
            expansions=[4],
            workers=1,
            batch_size=256,
            epochs=2,
            eval_tokens=512,
            corpus=data_root / "corpus",
            heldout="after_store",
        )
    )
    (name,) = result.sae_dirs
    m = {**result.metrics[name]["train"], **result.metrics[name]["eval"]}
    assert all(math.isfinite(m[k]) for k in ("loss", "explained_variance", "mse", "ce_loss_recovered")), m
    assert m["explained_variance"] > 0.2 and m["dead_fraction"] < 0.9
    training = json.loads((result.sae_dirs[name] / "training.json").read_text())
    assert training["normalizer_scale"] < 1e-3 and isinstance(training["warnings"], list)

    model, _ = load_lm(str(huge_lm_dir))
    sae = SparseAutoencoder.load(result.sae_dirs[name])
    h = residuals(model, [3], torch.tensor([[1, 5, 9, 13, 17, 21]]))[3][0, 1:]
    assert h.abs().max() > 65504 and torch.isfinite(sae(h)).all()

    run = run_vectors(
        VectorConfig.from_dict(
            {
                "sae": str(result.sae_dirs[name]),
                "model": str(huge_lm_dir),
                "task": str(REPO / "examples" / "transport-views.jsonl"),
                "samples": 4,
                "max_perspectives": 2,
                "publish": False,
                "track": False,
                "out": str(tmp_path / "vectors"),
                "device": "cpu",
            }
        )
    )
    for vectors in run.sets.values():
        assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in vectors.vectors.values())
