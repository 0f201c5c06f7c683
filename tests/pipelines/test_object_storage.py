"""collect and train with every artifact on a real S3 server (moto, tests/s3_server.py): the store, Ray
Train's checkpoints and the SAE directories on ``s3://``. The collected store equals a local-disk one byte
for byte; training on S3 against training on local disk is compared in tests/cluster/test_multinode.py
(two workers on two nodes reading the S3 store vs one node reading a local one).

Ray is started here, after the ``AWS_*`` variables point at the server, so its workers inherit them (as
pods of a KubeRay cluster get them from a secret).

A collection driver killed (SIGKILL) while a shard's upload is in flight — held at a known point by a TCP
relay in front of the server (tests/s3_server.py ``HoldingRelay``) — leaves no partial shard visible, and
the rerun completes the store to the content of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml

from pipelines.collect import CollectConfig, CollectResult, collect
from pipelines.store import ActivationStore, read_manifest
from pipelines.train import TrainConfig, run_train
from sae import storage
from sae.model import SparseAutoencoder
from tests.conftest import REPO, content_hash, synthetic_store
from tests.s3_server import HoldingRelay

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_ray(s3_server):
    import ray

    patch = pytest.MonkeyPatch()
    for key, value in s3_server.env.items():
        patch.setenv(key, value)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never another's Ray
    yield s3_server
    ray.shutdown()
    patch.undo()


def _bucket(server) -> str:
    return server.create_bucket(f"pipelines-{uuid.uuid4().hex[:12]}")


def _collect_cfg(model: Path, out: storage.Location, data_root: Path) -> CollectConfig:
    return CollectConfig.from_dict(
        {
            "model": str(model),
            "layers": [3],
            "context_size": 32,
            "n_tokens": 300,
            "batch_size": 2,
            "contexts_per_shard": 4,  # 124 rows per full shard: 3 shards, the last one truncated
            "store_dtype": "float32",
            "out": out,
            "corpus": str(data_root / "corpus"),
            "sources": ["ag_news"],
            "torch_threads": 1,
            "track": False,
        }
    )


@pytest.fixture(scope="module")
def local_collect(s3_ray, tiny_lm_dir, data_root, tmp_path_factory) -> CollectResult:
    """The uninterrupted collect on local disk that the S3 stores are compared with."""
    return collect(_collect_cfg(tiny_lm_dir, tmp_path_factory.mktemp("local") / "store", data_root), echo=print)


def _shards(result: CollectResult) -> list[tuple[str, int, str]]:
    return [(s.name, s.rows, s.sha256) for s in result.manifest.shards]


def test_collect_to_s3_equals_a_local_collect(s3_ray, local_collect, tiny_lm_dir, data_root) -> None:
    uri = f"{_bucket(s3_ray)}/stores/tiny"
    remote = collect(_collect_cfg(tiny_lm_dir, uri, data_root), echo=lambda _: None)
    local = local_collect
    assert remote.out == uri and remote.manifest.complete and remote.manifest.rows == 300
    assert _shards(remote) == _shards(local)  # the same bytes, shard for shard
    assert storage.listdir(uri) == sorted(p.name for p in local.out.iterdir())  # no leftovers
    a, b = ActivationStore(uri), ActivationStore(local.out)
    a.verify()
    torch.testing.assert_close(a.read(3), b.read(3))
    assert a.manifest.stats == b.manifest.stats and remote.bytes_per_token == local.bytes_per_token
    rows = a.ray_dataset().take_all()  # Ray Data reads the shards from the bucket through the same filesystem
    got = sorted(tuple(np.asarray(r["layer_3"], dtype=np.float32).tolist()) for r in rows)  # in any order
    assert got == sorted(map(tuple, b.read(3).tolist()))
    again = collect(_collect_cfg(tiny_lm_dir, uri, data_root), echo=lambda _: None)  # a rerun resumes: no work
    assert again.computed == [] and again.manifest.rows == 300


@pytest.mark.fault
def test_driver_killed_while_a_shard_uploads_leaves_no_partial_shard(
    s3_ray, local_collect, tiny_lm_dir, data_root, tmp_path
) -> None:
    """``pluristeer collect`` into the bucket through a relay that holds the CompleteMultipartUpload of the last
    shard (its one part already on the server); the driver and its Ray are killed with SIGKILL right then."""
    bucket = _bucket(s3_ray)
    name, uri = bucket.removeprefix("s3://"), f"{bucket}/stores/killed"
    cfg = _collect_cfg(tiny_lm_dir, uri, data_root)  # 3 shards, one actor: 0 and 1 uploaded when 2 is
    config = tmp_path / "collect.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    key = "stores/killed/shard-00002.parquet"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, killed with it
    env.update(PYTHONPATH=str(REPO), WANDB_MODE="disabled", PLURISTEER_RAY_DASHBOARD="0")
    command = [sys.executable, "-m", "pluristeer.cli", "collect", "--config", str(config)]
    with HoldingRelay(s3_ray.port, rf"POST /{name}/{re.escape(key)}\?uploadId=") as relay:
        env["AWS_ENDPOINT_URL"] = relay.endpoint  # the driver and its actors reach the bucket through the relay
        t0 = time.monotonic()
        driver = subprocess.Popen(
            command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            while not relay.held.wait(0.1) and driver.poll() is None and time.monotonic() - t0 < 180:
                pass
            in_flight = s3_ray.multipart_uploads(name)  # begun, not completed: what the kill interrupts
            visible_before = storage.listdir(uri)
        finally:
            try:
                processes = psutil.Process(driver.pid).children(recursive=True)  # its Ray: raylet, workers, actor
            except psutil.NoSuchProcess:
                processes = []
            with contextlib.suppress(ProcessLookupError):  # (gone already if it failed: the asserts below say so)
                os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-upload
            killed_at = time.monotonic() - t0
            driver.wait()
            _, alive = psutil.wait_procs(processes, timeout=30)
            for proc in alive:  # one that left the driver's process group: by its pid
                proc.kill()
    output = driver.stdout.read().decode()
    assert relay.held.is_set(), output[-3000:]
    assert relay.request.startswith(f"POST /{name}/{key}?uploadId="), relay.request
    (upload_id,) = [u for k, u in in_flight if k == key]
    assert s3_ray.parts(name, key, upload_id)[0] > 0  # the shard's bytes are on the server, only uncommitted
    whole = ["shard-00000.parquet", "shard-00001.parquet"]  # uploaded before shard 2's began (one actor)
    assert visible_before == ["manifest.json", *whole]

    # After the kill: the in-flight shard is not visible; the visible ones are whole (byte for byte the
    # uninterrupted run's), and those the manifest lists match it (the driver records a shard once its row
    # reaches it through Ray Data: shard 1's may not have yet).
    manifest = read_manifest(uri)
    listed = [s.index for s in manifest.shards]
    assert not manifest.complete and listed in ([], [0], [0, 1]), listed
    assert storage.listdir(uri) == visible_before  # no shard-00002.parquet, whole or partial
    ActivationStore(uri, allow_incomplete=True).verify()  # every listed shard: its sha256 and row count
    reference = {s.name: s.sha256 for s in local_collect.manifest.shards}
    assert {n: storage.sha256(storage.join(uri, n)) for n in whole} == {n: reference[n] for n in whole}
    assert (key, upload_id) in s3_ray.multipart_uploads(name)  # never completed: S3 keeps it out of sight

    again = collect(cfg, echo=lambda _: None)  # the rerun, straight to the server
    assert again.skipped == listed and sorted(again.computed) == [i for i in (0, 1, 2) if i not in listed]
    assert again.manifest.complete
    assert _shards(again) == _shards(local_collect)  # the same bytes as the uninterrupted run, shard for shard
    assert content_hash(uri) == content_hash(local_collect.out)
    assert storage.listdir(uri) == sorted(p.name for p in local_collect.out.iterdir())
    print(f"killed {killed_at:.1f} s after the driver started, mid-upload of {key}; the manifest listed {listed}")


def _train_cfg(store: storage.Location, out: storage.Location) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "store": str(store),
            "expansions": [4],
            "k": 4,
            "lr": 3e-3,
            "batch_size": 512,
            "epochs": 1,
            "workers": 2,
            "checkpoint_every": 8,
            "log_every": 8,
            "out": str(out),
            "eval_tokens": 0,
            "track": False,
            "dead_tokens": 2048,
        }
    )


def test_train_from_and_to_s3_keeps_checkpoints_and_saes_in_the_bucket(s3_ray, tmp_path) -> None:
    bucket = _bucket(s3_ray)
    store_uri = f"{bucket}/stores/synthetic"
    synthetic_store(store_uri, rows=4096, shards=4)
    remote = run_train(_train_cfg(store_uri, f"{bucket}/train"))
    assert remote.checkpoint is not None and remote.checkpoint.startswith(f"{bucket}/train/ray/")
    assert storage.listdir(remote.checkpoint) != []  # Ray Train wrote its checkpoint into the bucket
    assert remote.steps == 4096 // 512 and list(tmp_path.iterdir()) == []
    sae_dir = remote.sae_dirs["topk-4x-k4"]
    assert sae_dir == f"{bucket}/train/L3-topk-4x-k4"
    assert storage.listdir(sae_dir) == ["cfg.json", "sae_weights.safetensors", "training.json"]
    training = storage.read_json(storage.join(sae_dir, "training.json"))
    assert training["store"]["path"] == store_uri
    assert training["store"]["manifest_sha256"] == storage.sha256(f"{store_uri}/manifest.json")
    sae = SparseAutoencoder.load(sae_dir)
    x = ActivationStore(store_uri).read(3, limit=512)
    explained = 1 - ((sae(x) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert torch.isfinite(explained) and explained > 0, float(explained)  # better than the mean: it learnt
