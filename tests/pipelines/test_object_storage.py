"""collect and train with every artifact on a real S3 server (moto, tests/s3_server.py): the store, Ray
Train's checkpoints and the SAE directories on ``s3://``. The collected store equals a local-disk one byte
for byte; training on S3 against training on local disk is compared in tests/cluster/test_multinode.py
(two workers on two nodes reading the S3 store vs one node reading a local one).

Ray is started here, after the ``AWS_*`` variables point at the server, so its workers inherit them (as
pods of a KubeRay cluster get them from a secret).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.collect import CollectConfig, collect
from pipelines.store import ActivationStore
from pipelines.train import TrainConfig, run_train
from sae import storage
from sae.model import SparseAutoencoder
from tests.conftest import synthetic_store

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


def test_collect_to_s3_equals_a_local_collect(s3_ray, tiny_lm_dir, data_root, tmp_path) -> None:
    uri = f"{_bucket(s3_ray)}/stores/tiny"
    remote = collect(_collect_cfg(tiny_lm_dir, uri, data_root), echo=lambda _: None)
    local = collect(_collect_cfg(tiny_lm_dir, tmp_path / "store", data_root), echo=lambda _: None)
    assert remote.out == uri and remote.manifest.complete and remote.manifest.rows == 300
    assert [(s.name, s.rows, s.sha256) for s in remote.manifest.shards] == [
        (s.name, s.rows, s.sha256) for s in local.manifest.shards
    ]  # the same bytes, shard for shard
    assert storage.listdir(uri) == sorted(p.name for p in (tmp_path / "store").iterdir())  # no leftovers
    a, b = ActivationStore(uri), ActivationStore(tmp_path / "store")
    a.verify()
    torch.testing.assert_close(a.read(3), b.read(3))
    assert a.manifest.stats == b.manifest.stats and remote.bytes_per_token == local.bytes_per_token
    rows = a.ray_dataset().take_all()  # Ray Data reads the shards from the bucket through the same filesystem
    got = sorted(tuple(np.asarray(r["layer_3"], dtype=np.float32).tolist()) for r in rows)  # in any order
    assert got == sorted(map(tuple, b.read(3).tolist()))
    again = collect(_collect_cfg(tiny_lm_dir, uri, data_root), echo=lambda _: None)  # a rerun resumes: no work
    assert again.computed == [] and again.manifest.rows == 300


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
